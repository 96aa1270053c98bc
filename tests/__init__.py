"""em_interp's tests."""

from tests import shapes as shapes  # the run-time shape checker named by --jaxtyping-packages (tests.shapes)
