from lightning_idlg.app import main

if __name__ == "__main__":
    main()
