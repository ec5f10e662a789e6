"""The course workbook, filled in: one file per lesson holding the functions that lesson asks you to write.

`minidiff course init DIR` writes these files with every body replaced by `raise NotImplementedError("lesson NN:
...")` (minidiff.course.workbook derives the blanks from this source, so the two cannot drift apart);
`minidiff course init DIR --solutions` writes them as they are here. They are checked like a student's code: the
milestones compare them with references written apart from them (minidiff/course/milestones) and the library.
A file imports an earlier lesson's functions as `from minidiff.course.solutions.lesson_NN import ...`; the
workbook's copy reads `from lesson_NN import ...`, your own earlier answer.
"""
