from qalign_repro.run import main

main()
