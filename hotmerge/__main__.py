from hotmerge.cli import main

main()
