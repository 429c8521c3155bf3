from loop_sync.cli import main

main()
