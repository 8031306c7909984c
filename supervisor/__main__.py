import sys

from asgi_supervise.cli import main

sys.exit(main())
