from pairforge.cli import main

main()
