from nightjar.cli import main

main()
