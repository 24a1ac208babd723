"""Every kernel variant this CPU runs against its float64 reference on fresh random inputs (kernel_checks.CHECKS);
a variant this CPU lacks is skipped, naming the instruction set, and runs on the next host that has it."""
import pytest

from kvmux.checks.kernels import CHECKS
from kvmux.ops import kernel_choice


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.name)
def test_variant_matches_float64_reference(check):
    missing = check.missing()
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    for trial in check.trials(check.variant, check.fmt, seed=1):
        result = trial.check()
        assert result["ok"], f"{check.name} {trial.label}: error {result['max_error']:.3g} is " \
                             f"{result['error_vs_bound']:.2f}x its bound"


def test_every_variant_and_format_has_a_check():
    checked = {(c.op, c.variant, c.fmt) for c in CHECKS}
    for v in kernel_choice.VARIANTS:
        for fmt in v.formats:
            assert (v.op, v.name, fmt) in checked, f"{v.op} variant {v.name!r} on {fmt} has no KernelCheck"
