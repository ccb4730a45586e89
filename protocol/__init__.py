"""Plain data shared by broker, workers and clients: constants, the canonical job, codecs,
the error catalogue and the translation of the C# request forms. No sockets, no torch."""
