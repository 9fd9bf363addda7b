"""compress.plumbing: what every command of the project shares, torch-free.

It imports nothing of the project outside itself and nothing beyond the standard library, so the target stage
(``export.on_target``, on a Jetson without torch) and ``trt_plugins`` can use it:

- ``errors``: ``PipelineError``, the one-line user error every command turns into exit code 2;
- ``cli``: the commands' conventions (exit codes, help format, bounded numbers, Ctrl-C);
- ``files``: atomic writes and output folders.
"""
