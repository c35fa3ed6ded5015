"""`omnilong probe`: the longest `seq_len` each stage's settings train at on this machine, found by real steps.

search.py bisects over lengths; trial.py is one trial (a torchrun job of the stage's engine);
run.py runs a stage's trials and judges each against the cap; report.py prints and records the
result; main.py does all of it for the command.
"""
