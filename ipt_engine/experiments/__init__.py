"""The paper's experiments end to end: PT, MSF per d_I, IST on three challenges, reconstruction,
IPT-initialised PT and the stability study; resumable stages cached in a run directory, and a report."""
