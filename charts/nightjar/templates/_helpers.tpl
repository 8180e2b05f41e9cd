{{/* The release's base name. */}}
{{- define "nightjar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "nightjar.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "nightjar.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "nightjar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: nightjar
{{- end }}

{{- define "nightjar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nightjar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "nightjar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "nightjar.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag or repository@digest */}}
{{- define "nightjar.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end }}

{{- define "nightjar.agentImage" -}}
{{- if or .Values.agent.image.repository .Values.agent.image.tag -}}
{{ .Values.agent.image.repository | default .Values.image.repository }}:{{ .Values.agent.image.tag | default .Values.image.tag | default .Chart.AppVersion }}
{{- else -}}
{{ include "nightjar.image" . }}
{{- end -}}
{{- end }}

{{/*
The rules the operator needs in every namespace it acts in; each line says why. Secrets: get
(storage credentials, the database Secret's keys checked before a Job starts) and create (the
presigned-URL Secret of a cross-namespace restore); never list or watch.
*/}}
{{- define "nightjar.namespacedRules" -}}
# Its own resources: kopf watches them, adds its finalizer and writes status; schedules create
# Backups and garbage collection deletes expired ones.
- apiGroups: ["nightjar.dev"]
  resources: ["backups", "backupschedules", "backupstorages", "restores", "verifications"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["nightjar.dev"]
  resources: ["backups"]
  verbs: ["create", "delete"]
# Schedules that verify create the restore drills of their backups.
- apiGroups: ["nightjar.dev"]
  resources: ["verifications"]
  verbs: ["create"]
- apiGroups: ["nightjar.dev"]
  resources: ["backups/status", "backupschedules/status", "backupstorages/status", "restores/status", "verifications/status"]
  verbs: ["get", "patch", "update"]
# Jobs and a Restore's access objects are owned by their Backup/Restore with blockOwnerDeletion;
# clusters with OwnerReferencesPermissionEnforcement (OpenShift) require update on finalizers.
- apiGroups: ["nightjar.dev"]
  resources: ["backups/finalizers", "restores/finalizers", "verifications/finalizers"]
  verbs: ["update"]
# The backup and restore Jobs, and their Pods' termination messages (the agents' results).
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create"]
# A restore drill without a scratch Secret: its ephemeral scratch server, a Pod and a Secret (its
# password) the operator creates and reads; the Pod is deleted when the drill ends, the Secret goes
# with its Verification (owner reference). The operator never changes nor deletes a Secret.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "get", "create", "delete"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create"]
# A Backup's files source is checked before its Job starts.
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get"]
# Whether a Backup is deleted with its namespace (then its snapshot stays): in a Role this is only
# the Role's own namespace (for RBAC a namespace is in itself); never list or watch.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["get"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# A Restore's (and a restore drill's) agent reports progress with a ServiceAccount of its own,
# allowed only to patch that one object's status (the operator can grant only what it holds:
# restores/status and verifications/status get, patch).
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["create"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["create"]
# Restore with stopApp: read the app's replicas, scale it to zero and back.
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets"]
  verbs: ["get"]
- apiGroups: ["apps"]
  resources: ["deployments/scale", "statefulsets/scale"]
  verbs: ["patch"]
{{- end }}

{{- define "nightjar.operatorArgs" -}}
- operator
{{- range .Values.watchNamespaces }}
- --namespace={{ . }}
{{- else }}
- --all-namespaces
{{- end }}
- --log-format={{ .Values.operator.logFormat }}
{{- if .Values.metrics.enabled }}
- --metrics-port={{ .Values.metrics.port }}
{{- else }}
- --metrics-port=0
{{- end }}
{{- if .Values.leaderElection.enabled }}
- --leader-elect
{{- end }}
{{- if .Values.operator.verbose }}
- --verbose
{{- end }}
{{- end }}
