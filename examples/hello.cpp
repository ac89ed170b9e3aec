#include <iostream>
int main() { std::cout << "Hello from C++ inside a TVM microVM" << std::endl; }
