"""``python -m distlab course release|grade``: the instructor's two commands."""
from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``course`` subcommand to the ``distlab`` command's subparsers."""
    c = sub.add_parser("course", help="release the labs' assignments to students, grade them")
    cmd = c.add_subparsers(dest="course_command", required=True)
    r = cmd.add_parser("release", help="write the student notebooks (solutions and hidden "
                                       "tests removed) into OUT")
    r.add_argument("out", metavar="OUT", help="the folder to write the notebooks to")
    r.add_argument("--solutions", action="store_true",
                   help="write the solved notebooks instead (still without hidden tests)")
    r.add_argument("--sources", default=None,
                   help="the folder of instructor notebooks (default: the checkout's labs/)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace notebooks already in OUT (by default they are kept: they "
                        "may hold a student's work)")
    g = cmd.add_parser("grade", help="grade every *.ipynb in DIR on real processes; "
                                     "write a CSV")
    g.add_argument("dir", metavar="DIR", help="a folder of submissions, one notebook each")
    g.add_argument("--out", required=True, help="the CSV to write (submission, lab, points, "
                                                "max_points, feedback)")
    g.add_argument("--timeout", type=float, default=300, help="seconds per notebook")
    g.add_argument("--jobs", type=int, default=2, help="notebooks graded at once")
    return c


def run(args, parser: argparse.ArgumentParser) -> int:
    """Carry out ``args``; bad arguments end in ``parser.error`` before any kernel starts."""
    from distlab.course.grading import grade, release
    try:
        if args.course_command == "release":
            written = release(args.out, solutions=args.solutions, sources=args.sources,
                              overwrite=args.overwrite)
            for path in written:
                print(path)
            if not written:
                print(f"every notebook is already in {args.out}: kept (--overwrite replaces them)")
            return 0
        rows = grade(args.dir, args.out, timeout=args.timeout, jobs=args.jobs)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        parser.error(str(e))   # exit status 2, the usage and the message, no traceback
    total = sum(r["points"] for r in rows)
    print(f"graded {len(rows)} notebook(s) into {args.out}; {total:g} points in all")
    return 0
