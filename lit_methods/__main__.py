from lit_methods.cli import main

main()
