from sparse3d.bench.command import main

main()
