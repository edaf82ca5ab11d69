from clipn_demo.cli import main

main()
