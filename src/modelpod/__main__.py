from modelpod.cli import main

raise SystemExit(main())
