"""crosscoding/verdicts.py: the pass rules every finding is printed with."""
from crosscoding import verdicts as V


def test_verdict_rules():
    """The pass rules of crosscoding/verdicts.py on the cases the validity issue names."""
    # an LM whose top-10 cost 0.0 points more than random-10 and whose Δ excess straddles 0: fails, flagged or not
    assert V.topk_vs_random(0.0, -1.2, 0.01, -0.05, 3.0, "ceiling")[0] == V.FAILS
    assert V.topk_vs_random(3.0, 0.5, 0.2, 0.1, 3.0, "")[0] == V.FAILS            # < 5 points where accuracy moves
    assert V.topk_vs_random(24.7, 19.0, 2.0, 1.7, 4.0, "ceiling")[0] == V.HOLDS
    assert V.topk_vs_random(24.7, 19.0, 2.0, -0.1, 4.0, "")[0] == V.FAILS         # Δ's interval reaches 0
    # at ceiling or chance a missing accuracy drop proves nothing: a large, clear Δ excess holds
    assert V.topk_vs_random(0.5, -0.5, 0.5, 0.3, 3.0, "ceiling")[0] == V.HOLDS
    assert V.topk_vs_random(0.5, -0.5, 0.2, 0.1, 3.0, "ceiling")[0] == V.FAILS     # under a tenth of the margin
    assert V.topk_vs_random(0.5, -0.5, 0.5, 0.3, 3.0, "")[0] == V.FAILS
    assert [V.accuracy_flag(a) for a in (1.0, 0.95, 0.9, 0.66, 0.65, 0.36)] == [
        "ceiling", "ceiling", "", "", "chance", "chance"]
    # joint: the AtP cases — 0.40 predicted, 2.42 measured; wrong sign — fail; within 2× holds
    assert V.joint(0.40, 2.42)[0] == V.FAILS and V.joint(-0.58, 0.94)[0] == V.FAILS
    assert V.joint(1.95, 2.42)[0] == V.HOLDS and V.joint(0.0, 0.0)[0] == V.FAILS
    assert V.above(0.01, "x")[0] == V.HOLDS and V.above(-0.01, "x")[0] == V.FAILS
    assert V.with_control(V.HOLDS, V.HOLDS) == V.UNINFORMATIVE
    assert V.with_control(V.HOLDS, V.FAILS) == V.HOLDS and V.with_control(V.FAILS, V.FAILS) == V.FAILS
