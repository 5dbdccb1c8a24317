"""Imported first by the forkserver (its preload list): from here on it, and every worker it
forks, ignores SIGINT. A Ctrl-C at the terminal goes to the whole process group; the forkserver
ignores SIGINT by itself only after its preload imports, and one that reached it during them
killed it and failed every worker start. The parent decides what Ctrl-C means, so it must never import this module (pool names it by a
string; tests/test_faults.py checks that importing the CLI leaves SIGINT alone)."""
import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)
