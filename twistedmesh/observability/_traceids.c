/*
 * twistedmesh.observability._traceids: the text of new ids, written in C.
 *
 * Every request the proxy forwards gets an x-request-id (a version 4 UUID) when it came without one, and,
 * with tracing on, a new trace (a traceparent). The numbers come from the injected random in Python; this
 * module only writes them out. In Python the UUID's 8-4-4-4-12 groups cost five slices and a join, about
 * 7,900 interpreter instructions per id with the draw; here the whole id costs about a fifth of that.
 * tracing.py keeps the Python code as the reference (TWISTEDMESH_PURE_PYTHON=1 uses it) and the tests
 * compare the two on many draws.
 *
 *   requestId(bits) -> bytes
 *       The UUID whose 122 random bits are bits' (a 128-bit int): its version nibble set to 4 and its
 *       variant to 0b10, as tracing.newRequestId does.
 *   startTrace(headers, bits, makeRequestId, sampleRate) -> context or None
 *       A new trace from a 192-bit draw, as tracing.propagate makes one: the high 128 bits are the trace
 *       id (made a UUID's bits when makeRequestId, whose text is then the x-request-id), the low 64 the
 *       span id; sampled is OpenTelemetry's TraceIdRatioBased decision on the trace id's low 56 bits.
 *       Appends (x-request-id, id) when makeRequestId and (traceparent, value) to the list headers, and
 *       returns a new context of the class given to setContext(cls, requestIdName, traceparentName) with
 *       its `ids` (b"<trace id>-<span id>") and `sampled` set (built without calling the class: its
 *       __init__ is not the place for this). None when an id is all zeros (the caller draws again), or
 *       when headers is not a plain list: the caller's Python code then does the same work.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static const char HEX[] = "0123456789abcdef";

/* The low n bytes of a non-negative int, big-endian. */
static int
intBytes(PyObject *v, unsigned char *out, Py_ssize_t n)
{
    if (!PyLong_Check(v)) {
        PyErr_SetString(PyExc_TypeError, "bits must be an int");
        return -1;
    }
#if PY_VERSION_HEX >= 0x030D0000
    {
        Py_ssize_t size;
        PyObject *zero = PyLong_FromLong(0);  /* a cached small int: no allocation */
        int negative = zero ? PyObject_RichCompareBool(v, zero, Py_LT) : -1;
        Py_XDECREF(zero);
        if (negative != 0) {
            if (negative > 0)  /* the message and type of the older versions' conversion */
                PyErr_SetString(PyExc_OverflowError, "can't convert negative int to unsigned");
            return -1;
        }
        size = PyLong_AsNativeBytes(v, out, n, Py_ASNATIVEBYTES_BIG_ENDIAN | Py_ASNATIVEBYTES_UNSIGNED_BUFFER);
        if (size < 0)
            return -1;
        if (size > n) {
            PyErr_SetString(PyExc_OverflowError, "bits: too many");
            return -1;
        }
        return 0;
    }
#else
    return _PyLong_AsByteArray((PyLongObject *)v, out, (size_t)n, 0, 0);
#endif
}

static void
hex(const unsigned char *in, Py_ssize_t n, char *out)
{
    Py_ssize_t i;
    for (i = 0; i < n; i++) {
        out[2 * i] = HEX[in[i] >> 4];
        out[2 * i + 1] = HEX[in[i] & 15];
    }
}

/* A version 4 UUID's fixed bits, in place in 16 bytes. */
static void
makeUUID(unsigned char *raw)
{
    raw[6] = (unsigned char)((raw[6] & 0x0F) | 0x40);
    raw[8] = (unsigned char)((raw[8] & 0x3F) | 0x80);
}

/* The canonical 36-character text of 16 bytes. */
static PyObject *
uuidText(const unsigned char *raw)
{
    PyObject *text = PyBytes_FromStringAndSize(NULL, 36);
    char *p;
    if (text == NULL)
        return NULL;
    p = PyBytes_AS_STRING(text);
    hex(raw, 4, p);
    p[8] = '-';
    hex(raw + 4, 2, p + 9);
    p[13] = '-';
    hex(raw + 6, 2, p + 14);
    p[18] = '-';
    hex(raw + 8, 2, p + 19);
    p[23] = '-';
    hex(raw + 10, 6, p + 24);
    return text;
}

static PyObject *
requestId(PyObject *module, PyObject *bits)
{
    unsigned char raw[16];
    if (intBytes(bits, raw, 16) < 0)
        return NULL;
    makeUUID(raw);
    return uuidText(raw);
}

static int
allZero(const unsigned char *p, int n)
{
    int i;
    unsigned char any = 0;
    for (i = 0; i < n; i++)
        any |= p[i];
    return any == 0;
}

/* Whether the integer x is below the double t, exactly (as Python compares an int with a float). */
static int
belowDouble(unsigned long long x, double t)
{
    double floorT;
    unsigned long long whole;
    if (t >= 18446744073709551616.0)  /* 2**64 */
        return 1;
    if (t <= 0.0)
        return 0;
    floorT = (double)(unsigned long long)t;  /* exact: t < 2**64 */
    whole = (unsigned long long)floorT;
    return x < whole || (x == whole && t > floorT);
}

/* The new trace of a draw: its ids, traceparent, request id (or None) and decision. Returns 1, or 0 for an
 * all-zero id (nothing made), or -1 with an error set. */
static int
makeTrace(PyObject *const *args, PyObject **idsOut, PyObject **traceparentOut, PyObject **ridOut, int *sampledOut)
{
    unsigned char raw[24];
    int makeRequestId, sampled;
    double rate;
    unsigned long long low56 = 0;
    PyObject *ids, *traceparent, *rid = NULL;
    char *p;
    int i;

    if (intBytes(args[0], raw, 24) < 0)
        return -1;
    makeRequestId = PyObject_IsTrue(args[1]);
    if (makeRequestId < 0)
        return -1;
    rate = PyFloat_AsDouble(args[2]);
    if (rate == -1.0 && PyErr_Occurred())
        return -1;
    if (makeRequestId)
        makeUUID(raw);  /* the trace id's 16 bytes are the UUID's */
    if (allZero(raw, 16) || allZero(raw + 16, 8))
        return 0;

    for (i = 9; i < 16; i++)
        low56 = (low56 << 8) | raw[i];
    sampled = rate >= 1.0 || (rate > 0.0 && belowDouble(low56, rate * 72057594037927936.0));  /* 2**56 */

    ids = PyBytes_FromStringAndSize(NULL, 49);
    if (ids == NULL)
        return -1;
    p = PyBytes_AS_STRING(ids);
    hex(raw, 16, p);
    p[32] = '-';
    hex(raw + 16, 8, p + 33);

    traceparent = PyBytes_FromStringAndSize(NULL, 55);
    if (traceparent == NULL) {
        Py_DECREF(ids);
        return -1;
    }
    p = PyBytes_AS_STRING(traceparent);
    memcpy(p, "00-", 3);
    memcpy(p + 3, PyBytes_AS_STRING(ids), 49);
    memcpy(p + 52, sampled ? "-01" : "-00", 3);

    if (makeRequestId) {
        rid = uuidText(raw);
        if (rid == NULL) {
            Py_DECREF(ids);
            Py_DECREF(traceparent);
            return -1;
        }
    }
    *idsOut = ids;
    *traceparentOut = traceparent;
    *ridOut = rid;
    *sampledOut = sampled;
    return 1;
}

/* setContext's class and header names (set once, when tracing.py is imported). */
static PyTypeObject *contextType;
static PyObject *requestIdName, *traceparentName, *s_ids, *s_sampled;

static PyObject *
setContext(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyType_Check(args[0]) || !PyBytes_CheckExact(args[1]) || !PyBytes_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "setContext(cls, requestIdName, traceparentName)");
        return NULL;
    }
    Py_INCREF(args[0]);
    Py_XSETREF(contextType, (PyTypeObject *)args[0]);
    Py_INCREF(args[1]);
    Py_XSETREF(requestIdName, args[1]);
    Py_INCREF(args[2]);
    Py_XSETREF(traceparentName, args[2]);
    Py_RETURN_NONE;
}

/* Append (name, value) to the list, taking the reference to value. */
static int
appendField(PyObject *headers, PyObject *name, PyObject *value)
{
    PyObject *field = PyTuple_Pack(2, name, value);
    int result;
    Py_DECREF(value);
    if (field == NULL)
        return -1;
    result = PyList_Append(headers, field);
    Py_DECREF(field);
    return result;
}

static PyObject *
startTrace(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *headers, *ids, *traceparent, *rid, *context;
    int sampled, made;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "startTrace(headers, bits, makeRequestId, sampleRate)");
        return NULL;
    }
    if (!PyList_CheckExact(args[0]))
        Py_RETURN_NONE;  /* not a plain list (its append may be its own): the caller's Python code */
    if (contextType == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "startTrace before setContext");
        return NULL;
    }
    headers = args[0];
    made = makeTrace(args + 1, &ids, &traceparent, &rid, &sampled);
    if (made <= 0) {
        if (made == 0)
            Py_RETURN_NONE;
        return NULL;
    }
    context = contextType->tp_alloc(contextType, 0);
    if (context == NULL || PyObject_SetAttr(context, s_ids, ids) < 0
        || PyObject_SetAttr(context, s_sampled, sampled ? Py_True : Py_False) < 0) {
        Py_XDECREF(context);
        Py_DECREF(ids);
        Py_DECREF(traceparent);
        Py_XDECREF(rid);
        return NULL;
    }
    Py_DECREF(ids);
    if (rid != NULL && appendField(headers, requestIdName, rid) < 0) {
        Py_DECREF(traceparent);
        Py_DECREF(context);
        return NULL;
    }
    if (appendField(headers, traceparentName, traceparent) < 0) {
        Py_DECREF(context);
        return NULL;
    }
    return context;
}

static PyMethodDef methods[] = {
    {"requestId", (PyCFunction)requestId, METH_O, "requestId(bits) -> the version 4 UUID of 128 random bits"},
    {"startTrace", (PyCFunction)(void (*)(void))startTrace, METH_FASTCALL,
     "startTrace(headers, bits, makeRequestId, sampleRate) -> a new context, its fields appended; or None"},
    {"setContext", (PyCFunction)(void (*)(void))setContext, METH_FASTCALL,
     "setContext(cls, requestIdName, traceparentName): what startTrace makes and appends"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "twistedmesh.observability._traceids",
    .m_doc = "The text of new request and trace ids (see tracing.newRequestId and tracing.propagate).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__traceids(void)
{
    /* (setContext's globals are replaced without a lock: the module relies on the GIL.) */
    if ((s_ids = PyUnicode_InternFromString("ids")) == NULL
        || (s_sampled = PyUnicode_InternFromString("sampled")) == NULL)
        return NULL;
    return PyModule_Create(&module);
}
