"""verdicts.py — every headline check's pass rule in one place. A check prints `holds`, `fails` or
`uninformative` with the rule it applied; the stages (ablate.py, controls.py, seeds.py, checkpoint_sets.py)
call these, and the app shows what they wrote. Plain Python (no torch, no pandas).

The rules were set before looking at the toy's numbers they report, and are not tuned on them:
- a set of latents carries the task at a revision when ablating it costs at least MIN_GAP accuracy points more
  than random sets of matched activation frequency, with the intervals of both differences (accuracy, logit
  difference) above 0. Where accuracy can hardly move (at ceiling, or near or below chance) the logit difference
  may also show it: its excess over random must be above 0 and remove at least MIN_MARGIN_SHARE of the mean
  |clean logit difference|;
- an attribution predicts a joint ablation when the measured Δ has the predicted sign and lies within a factor
  JOINT_FACTOR of the prediction;
- a comparison (ρ of one measure against another, a rate against its null) holds when its interval excludes
  the other side;
- a check whose negative control also holds is uninformative: it credits something the control removed.
"""
HOLDS, FAILS, UNINFORMATIVE = "holds", "fails", "uninformative"

MIN_GAP = 5.0            # accuracy points a top-k set must cost beyond random-k sets
MIN_MARGIN_SHARE = 0.1   # ... or, where accuracy cannot move, the share of the mean |clean logit difference| it removes
CEILING = 0.95           # clean accuracy at or above this: at ceiling (a drop needs a margin crossed)
CHANCE = 0.65            # clean accuracy at or below this: near or below chance (most pairs wrong or a coin flip)
JOINT_FACTOR = 2.0       # measured joint Δ within this factor of the predicted one


def accuracy_flag(acc_clean: float) -> str:
    """'ceiling', 'chance' (near or below it) or '' (accuracy can move both ways)."""
    return "ceiling" if acc_clean >= CEILING else "chance" if acc_clean <= CHANCE else ""


TOPK_RULE = (f"holds when the top-k set costs ≥ {MIN_GAP:g} accuracy points more than random-k sets, with the "
             "intervals of both excesses (accuracy, Δ) above 0")
TOPK_FLAGGED_RULE = ("where accuracy is at ceiling or near chance (a missing drop proves nothing there), it also holds "
                     "when the top-k set's excess Δ over random-k sets has its interval above 0 and removes "
                     f"≥ {MIN_MARGIN_SHARE:g} of the mean |clean logit difference|")
JOINT_RULE = f"holds when the measured Δ has the predicted sign and lies within {JOINT_FACTOR:g}× of the prediction"


def topk_vs_random(gap_acc, gap_acc_lo, gap_delta, gap_delta_lo, scale, flag) -> tuple[str, str]:
    """Does ablating a revision's top-k set cost more than random-k sets there? gap_*: top minus random (accuracy
    in points, Δ in logits) with the low ends of their intervals; scale: the mean |clean logit difference|.
    Returns the verdict and the rule applied."""
    by_accuracy = gap_acc >= MIN_GAP and gap_acc_lo > 0 and gap_delta_lo > 0
    if not flag:
        return (HOLDS if by_accuracy else FAILS), TOPK_RULE
    by_delta = gap_delta_lo > 0 and gap_delta >= MIN_MARGIN_SHARE * scale
    rule = f"{TOPK_RULE}; accuracy at {flag}: {TOPK_FLAGGED_RULE} ({scale:.3g})"
    return (HOLDS if by_accuracy or by_delta else FAILS), rule


def joint(predicted, measured) -> tuple[str, str]:
    """Does the summed attribution predict the joint ablation of the set?"""
    ok = predicted != 0 and measured * predicted > 0 and 1 / JOINT_FACTOR <= measured / predicted <= JOINT_FACTOR
    return (HOLDS if ok else FAILS), JOINT_RULE


def above(lo, what) -> tuple[str, str]:
    """A difference (or a value against its null) whose interval's low end is lo."""
    return (HOLDS if lo > 0 else FAILS), f"holds when the interval of {what} lies above 0"


def with_control(real: str, control: str) -> str:
    """A check that holds where its negative control also holds credits what the control removed: uninformative."""
    if real != HOLDS:
        return real
    return UNINFORMATIVE if control == HOLDS else HOLDS


NULL_CEILING = 0.95      # a null rate at or above this leaves no room above it
MIN_ITEMS = 5            # a rate over fewer items than this says nothing
VERSUS_NULL_RULE = ("holds when the rate's 95% interval lies above its null's; fails when the rate is inside or "
                    f"below the null's interval; uninformative when the null's mean is ≥ {NULL_CEILING:g} (no room "
                    f"above it), when fewer than {MIN_ITEMS} items are behind the rate, or when the rate is above the "
                    "null's interval but its own interval reaches into it")


def versus_null(rate, lo, hi, n, null_mean, null_lo, null_hi) -> tuple[str, str]:
    """A rate (the mean over n items, with its interval lo–hi) against its null (the null's mean and central
    interval): the verdict and why (VERSUS_NULL_RULE)."""
    if n < MIN_ITEMS:
        return UNINFORMATIVE, f"only {n} items behind the rate (< {MIN_ITEMS})"
    if null_mean >= NULL_CEILING:
        return UNINFORMATIVE, f"the null is {null_mean:.3f} (≥ {NULL_CEILING:g}): no room above it"
    if lo > null_hi:
        return HOLDS, f"[{lo:.3f}, {hi:.3f}] above the null's [{null_lo:.3f}, {null_hi:.3f}]"
    if rate <= null_hi:
        return FAILS, f"{rate:.3f} inside or below the null's [{null_lo:.3f}, {null_hi:.3f}]"
    return UNINFORMATIVE, (f"{rate:.3f} above the null's [{null_lo:.3f}, {null_hi:.3f}] but its interval "
                           f"[{lo:.3f}, {hi:.3f}] reaches into it")
