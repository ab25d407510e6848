-- The collector's marks, one per run: a run lifts only its own, so concurrent runs of the collector
-- cannot lift each other's while one of them may still remove the object.
CREATE TABLE blob_marks (
    sha256 TEXT NOT NULL,
    run TEXT NOT NULL,
    until_ms INTEGER NOT NULL,
    PRIMARY KEY (sha256, run)
) WITHOUT ROWID;

DROP TABLE blob_condemned;
