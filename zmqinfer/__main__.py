from zmqinfer.cli.main import main

raise SystemExit(main())
