from lowrank_cli.cli.app import main

main()
