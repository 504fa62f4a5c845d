from sparse3d.densify.command import main

main()
