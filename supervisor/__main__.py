import sys

from asgi_supervise.launch import main

sys.exit(main())
