"""The deployment tuner: profile → fit a cost model → search plans → simulate one decode iteration.

Glossary (the words of MegaScale-Infer, arXiv 2504.02263, as this package uses them):

| symbol | meaning |
|---|---|
| n_a, n_e | attention ranks, expert ranks (each rank may span tp_a / tp_e GPUs, tensor parallel) |
| m | micro-batches per step per attention rank |
| B | global decode batch: sequences decoding at once over all attention ranks |
| b_a | sequences per micro-batch per attention rank = B / (n_a · m) |
| T_a | one attention rank's time for one layer of one micro-batch (b_a sequences, context ctx) |
| T_e | one expert rank's time for one layer of one micro-batch (its routed tokens, experts hit) |
| T_c | one-way transfer time of one micro-batch's tokens for one layer (dispatch or combine) |
| T_f | max(T_a, T_e): the slower side, which sets the pace of the ping-pong |
| r | T_c / T_f; ping-pong hides the transfers when m ≥ 2(1 + r) |

Modules, bottom up. Pure Python (no torch, fast enough for unit tests): `model_shape` (a model's
dimensions, from the loader's config reader `models.spec`, or a preset), `fit` (least squares and fit
quality), `hardware` (GPU catalogue), `costs` (stage times for a device: profiled or roofline),
`simulate` (the discrete-event simulation of one decode iteration), `trace` (measured trace events →
the simulator's spans and stage gaps), `search` (the plan search over GPUs), `profile` (measured
samples, the fitted stage costs and interference terms, saved as JSON; predictions for the profiled
machine), `local` (the plan search on the profiled machine), `plan_file` (the plan file `shuttle tune
plan` writes). Measuring, with torch and Ray: `speed` (the machine's speed probe), `measure` (run one
deployment shape and time its decode steps), `profiler` (profile a deployment: `shuttle tune
profile`), `timeline` (predicted and measured Gantt charts, matplotlib).
Thread counts follow the deployment's rule, `cluster/threads.py`.
"""
