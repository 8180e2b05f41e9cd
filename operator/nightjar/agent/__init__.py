"""What runs inside the operator's Jobs (``nightjar agent ...``). Never imports kopf."""
