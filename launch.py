# LoRA Studio's first command, the same line in bash, zsh, cmd and PowerShell:
#
#     python launch.py          (Windows: py launch.py; where only python3 exists: python3 launch.py)
#
# On the first run it makes .venv, installs the torch build for this machine's GPU and everything else at the
# versions in requirements.lock, then starts the app; later runs just start it. `python launch.py --help` lists
# its options; every other option goes to the app (--port, --no-browser, --workspace, --listen, --window ...).
#
# This file is kept readable by any Python, so an old one gets a clear line instead of a SyntaxError; the work
# is done by app/launcher.py (standard library only).
import os
import sys

if sys.version_info < (3, 8):  # from 3.8 the launcher itself runs, and finds or fetches a Python LoRA Studio runs on
    sys.stderr.write(
        "LoRA Studio runs on Python 3.11 to 3.13, and this launcher needs 3.8 or newer to find one; this is Python %d.%d "
        "(%s). Install Python 3.12 from https://www.python.org/downloads/ and run 'py -3.12 launch.py' (Windows) or "
        "'python3.12 launch.py'.\n" % (sys.version_info[0], sys.version_info[1], sys.executable))
    sys.exit(1)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from app.launcher import main  # noqa: E402

sys.exit(main())
