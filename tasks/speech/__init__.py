"""Spoken-word classification from raw audio: Speech Commands, FSDD, or any `<class>/*.wav` folder.

The task class is `tasks.speech.task.SpeechTask` (configs/task/speech.yaml)."""
