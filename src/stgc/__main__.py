from stgc.cli import main

main()
