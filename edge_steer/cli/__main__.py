from edge_steer.cli import main

main()
