"""What one notebook needs (its sweeps, start functions, figures): one module per lab.

``settings`` holds the course switches (the small setting, solutions for instructors).
Topic folders never import this folder.
"""
