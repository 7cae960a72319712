"""Folding adapters and factor pairs back into plain weights: the delta each PEFT adapter type adds
(`deltas`) and which base tensor each adapter tensor belongs to (`plan`). No file access here."""
