"""The checkers' tests: their own functions (the broken variants) travel to the worker
processes by value, because importing a test module there (nbgrader and all) would cost more
than a checker's time limit on a loaded machine.

Each checker's tests run the lab's solution on one case (the other cases of the lab's check
cells, hidden tests included, run when tests/course/test_grading.py grades the solved lab)
and the classic mistakes on the cases that show them."""
import cloudpickle


def pytest_collection_modifyitems(items):
    for module in {item.module for item in items if getattr(item, "module", None)}:
        if "/tests/exercises/" in (module.__file__ or ""):
            cloudpickle.register_pickle_by_value(module)
