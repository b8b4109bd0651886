"""The exceptions that reach a user as one sentence instead of a traceback."""


class UserError(Exception):
    """Bad input from the user: the message names what is wrong and how to fix it.

    The command line catches it, prints the message alone and exits non-zero. Raise it before
    anything is written, so that a failed command leaves a run directory as it was.
    """


class TrainingInterrupted(Exception):
    """A training run stopped by a signal (SIGTERM, SIGINT, SIGUSR1) after writing a checkpoint
    at its current step. The command line prints one line saying how to resume and exits with
    128 + the signal number, as a shell reports a process ended by that signal."""

    def __init__(self, signal_number: int, step: int, steps: int, run_dir: str):
        import signal

        self.signal_number = signal_number
        self.name = signal.Signals(signal_number).name
        super().__init__(f"stopped by {self.name} at step {step} of {steps}; the checkpoint in "
                         f"'{run_dir}' is saved: run the same command again to continue.")
