from bpfscope.cli import main

main()
