from bpfscope.cli.main import main

main()
