"""A run that SIGKILLs itself mid-stream (tests/test_resume_e2e.py launches it).

Usage: python tests/resume_worker.py WORKDIR MODEL_CACHE KILL_AT
Runs attention distance then intra-model CKA (with other similarity measures, one of each
kind of state, and a shuffle null) on the smoke models with a partial-state save at
every step; with KILL_AT = N > 0 the process kills itself (SIGKILL, no clean-up) when the N-th
save is about to be written, so the steps since the previous save are lost and must be
recomputed, never counted twice, by the rerun.
"""
import os
import signal
import sys

from absl import logging


def main(workdir: str, cache: str, kill_at: int) -> None:
  from vit_analysis import analyses, config_lib
  from vit_analysis import main as main_lib
  from vit_analysis.runtime import resume  # pylint: disable=g-import-not-at-top
  if kill_at > 0:
    calls = [0]
    real = resume.Checkpointer.maybe_save

    def maybe_save(self, *args, **kwargs):
      calls[0] += 1
      if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
      return real(self, *args, **kwargs)

    resume.Checkpointer.maybe_save = maybe_save
  config = config_lib.base_config("smoke")
  del config.models["resnet"]
  config.model_cache = cache
  config.analyses = ("attention_distance", "cka_intra")
  config.attention_distance = analyses.default_config("attention_distance")
  config.attention_distance.update(dict(num_images=64, batch_size=8, checkpoint_every_s=0.0,
                                        figure_formats=("png",)))
  config.cka_intra = analyses.default_config("cka_intra")
  # Other similarity measures with a null, one of each kind of saved state and step input: a
  # ratio-type measure (summed HSIC terms, cka.CKAState), mean-type ones (per-minibatch rows),
  # PWCCA reading the features and RSA's correlation distance the pattern moments; all others
  # share these states (every measure compiles for seconds on 2 cores, times 3 runs here).
  config.cka_intra.update(dict(num_examples=256, minibatch_size=16, repeats=3, layers="blocks",
                               checkpoint_every_s=0.0, figure_formats=("png",),
                               measures=("linear_cka", "distance_correlation", "pwcca", "rsa"),
                               null_permutations=2,
                               measure_options={"rsa": {"distance": "correlation"}}))
  logging.set_verbosity(logging.INFO)  # the log the test reads (not through absl.app here)
  main_lib.run(config, workdir)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
