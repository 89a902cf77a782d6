"""The paper's own CIFAR-10 numbers (He et al. 2015, Table 6), kept as data so tables can quote them beside ours.

Only numbers printed in the paper are here. The plain nets have no error in Table 6 (they appear only as curves in
Figure 6), so there is deliberately no entry for them.
"""

from __future__ import annotations

from dataclasses import dataclass

CITATION = (
    "K. He, X. Zhang, S. Ren, J. Sun. Deep Residual Learning for Image Recognition. "
    "arXiv:1512.03385, 2015 (CVPR 2016), Section 4.2, Table 6."
)
SOURCE = "He et al. 2015, Table 6"


@dataclass(frozen=True)
class PaperResult:
    """One row of the paper's Table 6: CIFAR-10 test error (%) of a ResNet with option-A shortcuts."""

    depth: int
    test_err: float  # the number printed in the table (for ResNet-110: the best of 5 runs)
    mean_std: str | None = None  # "mean±std" over runs, only printed for ResNet-110

    def describe(self) -> str:
        """The number as the paper reports it, e.g. '6.43 (best of 5; 6.61±0.16)'."""
        return f"{self.test_err:.2f}" if self.mean_std is None else f"{self.test_err:.2f} (best of 5; {self.mean_std})"


# Table 6, ResNet rows; all use option A shortcuts, 64k iterations, 45k/5k split for the schedule, 10k test set.
TABLE6: dict[int, PaperResult] = {
    r.depth: r
    for r in (
        PaperResult(20, 8.75),
        PaperResult(32, 7.51),
        PaperResult(44, 7.17),
        PaperResult(56, 6.97),
        PaperResult(110, 6.43, mean_std="6.61±0.16"),
        PaperResult(1202, 7.93),
    )
}


def paper_result(arch: str, depth: int | None, shortcut: str) -> PaperResult | None:
    """The paper's Table 6 entry for this model, or None where the paper prints no number."""
    if arch != "resnet" or shortcut != "A" or depth is None:
        return None
    return TABLE6.get(depth)
