from omct.cli import main

raise SystemExit(main())
