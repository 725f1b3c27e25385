from traxd.cli import main

raise SystemExit(main())
