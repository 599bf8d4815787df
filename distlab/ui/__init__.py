"""The labs' live figures (``figures``) and run control panel (``panel``).

Only ``course/`` and the notebooks import this folder; topic folders never do.
"""
