from pdengine.cli import main

raise SystemExit(main())
