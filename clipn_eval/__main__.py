from clipn_eval.cli import main

main()
