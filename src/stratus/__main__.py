from stratus.cli import main

raise SystemExit(main())
