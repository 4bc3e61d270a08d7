from qalign_repro.stages.run import main

main()
