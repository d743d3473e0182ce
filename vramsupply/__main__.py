from vramsupply.cli import main

main()
