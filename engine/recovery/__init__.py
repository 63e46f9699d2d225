"""Recovery after compression: Bolaco's subspace post-training and Basis Selection's relearned scales.

`settings.RecoverySettings` says what to train; `training.recover` runs it (resumable, stored) and
returns the recovered plan. The trainable modules and the folding maths live one room down, in
`engine.compression.recovered`, because applying a recovered plan is part of applying any plan.
"""
