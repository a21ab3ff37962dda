from trajscope.cli import main

raise SystemExit(main())
