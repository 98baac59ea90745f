from livecopy.cli import main

main()
