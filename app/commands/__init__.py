"""The handlers of ``kvjudge``, one module per command group; :mod:`kvjudge.app.cli` builds the
parser from their ``add_parsers`` functions and is the entry point.

``judge`` (judge), ``run`` (validate, run, dashboard), ``eval`` (eval), ``diagnose`` (diagnose),
``calibrate`` (calibrate, calibrate-gate), ``bench`` (bench judge / run / compress / gates /
generate), ``env`` (env); ``common``: what they share. Each module imports the standard library and
torch-free tables at the top and its heavy stack (torch, transformers, Ray) inside its handlers.
"""
